"""Hidden-state distillation (`kd.layer_map`): the student's intermediate hidden states are pulled towards the
teacher's, layer pair by layer pair, as a term added to the logit distillation loss.

For each pair (s, t) of 0-based decoder-block indices, h_s is the output of the student's block s and h_t the
output of the teacher's block t, at every position: the residual stream as the next block receives it. The model's
final norm (GPT-2's ln_f, Llama's norm) is not included, for the last block either (HF's output_hidden_states
applies it to its last entry; these states are the block outputs before it). Where the widths differ, h_s goes
through a learned linear map W (d_student -> d_teacher, no bias), trained with the student (TinyBERT's W_h:
Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding", eq. 8); otherwise W is the
identity. Per target position and pair:

    mse     mean_j (W h_s - h_t)_j²                    (TinyBERT's hidden-state MSE, averaged over the width)
    cosine  1 - cos(W h_s, h_t)                         (DistilBERT's cosine embedding loss: Sanh et al. 2019)

averaged over the pairs and summed over the target positions (targets != -100), like the engine's other sums.

The states are caught by forward hooks on the mapped blocks, so both models run their usual forward (the KD
loss's) and nothing is computed twice. The projections live in a HiddenStateDistillation module that the distill
recipe attaches to the student as `student.kd_hidden`: the engine's optimizer, checkpoints and exact resume then
include them, and the recipe takes them off (strip_hidden_distillation) before the student is saved.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune.errors import ConfigError, TuneError

ATTRIBUTE = "kd_hidden"  # the student's attribute holding the module while it trains
# where decoder blocks live: our GPT; Llama / Mistral / Qwen / Gemma / Phi; GPT-2 / GPT-1 / GPT-J / GPT-Neo /
# Falcon / BLOOM; GPT-NeoX / Pythia; OPT
_BLOCK_PATHS = ("blocks", "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the native GPT (`model.blocks`), an HF causal LM (`model.layers`, `transformer.h`,
    `gpt_neox.layers`, `model.decoder.layers`) or a peft wrapper of one, in order. TuneError when none is found."""
    inner = _inner(model)
    for path in _BLOCK_PATHS:
        found = inner
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return found
    raise TuneError(f"kd.layer_map: cannot find the decoder blocks of {type(inner).__name__} (looked for "
                    f"{', '.join(_BLOCK_PATHS)}); hidden-state distillation supports the native GPT and HF causal "
                    "LMs laid out like GPT-2, Llama, GPT-NeoX or OPT")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding that starts every forward: the native GPT's `tok_emb`, an HF model's input embeddings."""
    inner = _inner(model)
    return inner.tok_emb if hasattr(inner, "tok_emb") else inner.get_input_embeddings()


def hidden_width(model: nn.Module) -> int:
    """The width of the hidden states between blocks: the native GPT's n_embd, an HF config's hidden_size."""
    config = _inner(model).config
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(width, int):
        raise TuneError(f"kd.layer_map: {type(_inner(model)).__name__}'s config names no hidden_size / n_embd")
    return width


class HiddenStateDistillation(nn.Module):
    """The hidden-state term for pairs `layer_map` [[s, t], ...]: one projection per pair (nn.Linear(student_width,
    teacher_width, bias=False) where the widths differ, nn.Identity otherwise), `loss` "mse" or "cosine" (see the
    module docstring), weighted by `weight` in the total loss (kd_loss_fn adds weight·loss_sum).

    attach(student, teacher) hooks the mapped blocks; after one forward of each model, loss_sum(mask) is the term
    for that batch. The module holds no reference to either model (only hook handles), so attaching it to the
    student as a child adds nothing but the projections to the student's parameters."""

    def __init__(self, layer_map, student_width: int, teacher_width: int, loss: str = "mse", weight: float = 1.0):
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ConfigError(f"kd.hidden_loss must be mse or cosine, got {loss!r}")
        if not layer_map or not all(len(pair) == 2 and min(pair) >= 0 for pair in layer_map):
            raise ConfigError(f"kd.layer_map must be a non-empty list of [student_layer, teacher_layer] pairs of "
                              f"0-based layer indices, got {layer_map}")
        self.pairs = [(int(s), int(t)) for s, t in layer_map]
        self.loss, self.weight = loss, float(weight)
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else nn.Identity()
            for _ in self.pairs)
        self._student_states: dict[int, torch.Tensor] = {}
        self._teacher_states: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._armed = False  # whether the student's block outputs are kept (see attach)

    def attach(self, student: nn.Module, teacher: nn.Module) -> "HiddenStateDistillation":
        """Forward hooks on the student's and the teacher's mapped blocks (replacing any earlier ones): each forward
        stores the block's output (B, T, width), the teacher's detached. ConfigError when a layer index is out of
        range for the loaded model.

        The student's outputs are kept from its token embedding's forward (the start of a forward) until loss_sum:
        with activation checkpointing a block runs again in the backward pass, and that recomputed output (with
        its graph) must not stay referenced here until the next step."""
        self.remove_hooks()
        student_blocks, teacher_blocks = decoder_blocks(student), decoder_blocks(teacher)
        for pair in self.pairs:
            for index, blocks, name in ((pair[0], student_blocks, "student"), (pair[1], teacher_blocks, "teacher")):
                if index >= len(blocks):
                    raise ConfigError(f"kd.layer_map: pair {list(pair)} names {name} layer {index}, but the {name}'s "
                                      f"layers are 0..{len(blocks) - 1} (0-based decoder blocks)")
        self._handles.append(input_embeddings(student).register_forward_pre_hook(self._arm))
        for index in sorted({s for s, _ in self.pairs}):
            self._handles.append(student_blocks[index].register_forward_hook(self._keeper(self._student_states, index,
                                                                                           student=True)))
        for index in sorted({t for _, t in self.pairs}):
            self._handles.append(teacher_blocks[index].register_forward_hook(self._keeper(self._teacher_states, index,
                                                                                           student=False)))
        return self

    def _arm(self, module, args):
        self._student_states.clear()
        self._armed = True

    def _keeper(self, states: dict, index: int, student: bool):
        def hook(module, args, output):
            if student and not self._armed:  # a block recomputed in the backward pass
                return
            # HF blocks return a tensor, or a tuple / list (GPT-1) whose first item is the hidden state
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            states[index] = hidden if student else hidden.detach()
        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._student_states.clear()
        self._teacher_states.clear()
        self._armed = False

    def loss_sum(self, mask: torch.Tensor) -> torch.Tensor:
        """The hidden-state loss of the last student and teacher forwards, summed over the positions where `mask`
        (B, T) bool is true (targets != -100), each position's loss averaged over the pairs; an fp32 scalar with
        gradients to the student and the projections. The stored states are released."""
        try:
            student = [self._student_states[s] for s, _ in self.pairs]
            teacher = [self._teacher_states[t] for _, t in self.pairs]
        except KeyError:
            raise TuneError("hidden-state distillation: no hidden states were caught; both models must run a forward "
                            "after attach() and before loss_sum()") from None
        total = torch.zeros((), device=mask.device, dtype=torch.float32)
        for projection, h_s, h_t in zip(self.projections, student, teacher):
            if h_s.shape[:2] != mask.shape or h_t.shape[:2] != mask.shape:
                raise TuneError(f"hidden-state distillation: hidden states {tuple(h_s.shape)} / {tuple(h_t.shape)} do "
                                f"not match the target mask {tuple(mask.shape)}")
            weight = getattr(projection, "weight", None)
            mapped = projection(h_s[mask] if weight is None else h_s[mask].to(weight.dtype)).float()  # (N, d_teacher)
            target = h_t[mask].float()
            if self.loss == "mse":
                per_position = (mapped - target).pow(2).mean(-1)
            else:
                per_position = 1 - F.cosine_similarity(mapped, target, dim=-1, eps=1e-8)
            total = total + per_position.sum()
        self._student_states.clear()
        self._teacher_states.clear()
        self._armed = False
        return total / len(self.pairs)


def strip_hidden_distillation(model: nn.Module) -> HiddenStateDistillation | None:
    """Take the hidden-state module off `model` (the student) and remove its hooks, so the model saves and exports
    as a plain model; returns the module (None when there was none)."""
    module = model._modules.pop(ATTRIBUTE, None)
    if module is not None:
        module.remove_hooks()
    return module
