"""The FathomNet 2025 winner's classifier (FathomnetModel, experiment-final14) as a plain nn.Module.

Parameter names match the Lightning checkpoint's `state_dict`, so weights load strictly. Four
DINOv2 encoders (object, and contexts at 3x, 5x and the whole image) come from transformers'
`Dinov2Model` built from a `Dinov2Config` sized from the weights: never a hub download. Each context's
patch tokens are attended by the object CLS through 4 cross-attention blocks; the four vectors are
concatenated, projected and classified (shared/notes/reference-pipeline.md, part B). The heads
the checkpoint has but inference never uses (hierarchical heads, object projections) are not built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

ENCODER_OBJ = "obj_vit_region_encoder"
ENCODER_ENV = "img_vit_region_encoders"
INFERENCE_PREFIXES = (ENCODER_OBJ, ENCODER_ENV, "intra_env_attn_module", "concat_proj", "classifier")


class CheckpointMismatch(ValueError):
    """Weights and architecture disagree; the message lists the keys."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture; stored as JSON beside the slim weights."""

    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int  # of the position-embedding table (518 for DINOv2: 37x37 patches)
    mlp_ratio: int
    crop_size: int
    scales: List[int]
    attn_blocks: int
    attn_heads: int
    class_names: List[str]
    encoder_overrides: Dict[str, object] = field(default_factory=dict)

    @property
    def env_keys(self) -> List[str]:
        return [f"{self.crop_size}_{s}" for s in self.scales]

    def encoder_config(self) -> Dinov2Config:
        cfg = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, patch_size=self.patch_size, image_size=self.image_size,
                   mlp_ratio=self.mlp_ratio, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                   qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
        cfg.update(self.encoder_overrides)
        config = Dinov2Config(**cfg)
        config._attn_implementation = "sdpa"  # private (transformers 4.x): PyTorch SDPA attention, as the winner ran
        return config

    @classmethod
    def infer(cls, state_dict: Mapping[str, torch.Tensor], class_names: Sequence[str], crop_size: int,
              scales: Sequence[int], encoder_overrides: Optional[Dict[str, object]] = None) -> "ModelSpec":
        """Read the sizes off the tensors. DINOv2 uses 64-dim heads; `encoder_overrides` (Dinov2Config
        fields) can say otherwise, since the head count is not in the weights."""
        def shape(key: str) -> torch.Size:
            if key not in state_dict:
                raise CheckpointMismatch(f"checkpoint has no {key!r}: not a FathomnetModel checkpoint")
            return state_dict[key].shape

        hidden = shape(f"{ENCODER_OBJ}.embeddings.cls_token")[-1]
        layer_ids = {int(m.group(1)) for k in state_dict
                     if (m := re.match(rf"{ENCODER_OBJ}\.encoder\.layer\.(\d+)\.", k))}
        positions = shape(f"{ENCODER_OBJ}.embeddings.position_embeddings")[1] - 1
        patch = shape(f"{ENCODER_OBJ}.embeddings.patch_embeddings.projection.weight")[-1]
        grid = int(round(positions ** 0.5))
        mlp = shape(f"{ENCODER_OBJ}.encoder.layer.0.mlp.fc1.weight")[0] // hidden
        key0 = f"{crop_size}_{scales[0]}"
        blocks = {int(m.group(1)) for k in state_dict
                  if (m := re.match(rf"intra_env_attn_module\.{re.escape(key0)}\.layers\.(\d+)\.", k))}
        n_classes = shape("classifier.net.4.weight")[0]
        if n_classes != len(class_names):
            raise CheckpointMismatch(f"classifier has {n_classes} outputs but {len(class_names)} class names")
        overrides = dict(encoder_overrides or {})
        heads = int(overrides.pop("num_attention_heads", max(1, hidden // 64)))
        return cls(hidden_size=hidden, num_layers=len(layer_ids), num_heads=heads, patch_size=patch,
                   image_size=grid * patch, mlp_ratio=mlp, crop_size=crop_size, scales=list(scales),
                   attn_blocks=len(blocks), attn_heads=8, class_names=list(class_names), encoder_overrides=overrides)


class AttentionLayer(nn.Module):
    """Object query attends a context's patch tokens; post-norm residual blocks."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim)
        self.value_proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(x)
        a, _ = self.attn(q, self.key_proj(kv), self.value_proj(kv), need_weights=False)
        x = self.norm1(a + q)
        return self.norm2(self.mlp(x) + x)


class MultiLayerAttention(nn.Module):
    def __init__(self, dim: int, heads: int, blocks: int):
        super().__init__()
        self.layers = nn.ModuleList(AttentionLayer(dim, heads) for _ in range(blocks))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, kv)
        return x


class Head(nn.Module):
    """A `.net` Sequential, so keys read `concat_proj.net.0.weight` as in the checkpoint."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FathomNetClassifier(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        enc = spec.encoder_config()
        self.obj_vit_region_encoder = Dinov2Model(enc)
        self.img_vit_region_encoders = nn.ModuleDict({k: Dinov2Model(enc) for k in spec.env_keys})
        self.intra_env_attn_module = nn.ModuleDict(
            {k: MultiLayerAttention(d, spec.attn_heads, spec.attn_blocks) for k in spec.env_keys})
        n_ctx = len(spec.scales) + 1
        self.concat_proj = Head(nn.Linear(n_ctx * d, d), nn.GELU(), nn.LayerNorm(d), nn.Dropout(0.3),
                                nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Dropout(0.3))
        self.classifier = Head(nn.Linear(d, d), nn.GELU(), nn.Dropout(0.3), nn.LayerNorm(d),
                               nn.Linear(d, len(spec.class_names)))

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
        """Strict load of checkpoint-named weights: any missing, unexpected or misshapen key is one
        error listing them all."""
        check_keys(self.checkpoint_shapes(), state_dict)
        self.load_state_dict(to_module_names(state_dict, self.state_dict().keys()), strict=True, assign=assign)

    def checkpoint_shapes(self) -> Dict[str, torch.Size]:
        """The state_dict this module expects, under the checkpoint's (transformers 4.x) names."""
        return {to_checkpoint_name(k): v.shape for k, v in self.state_dict().items()}

    def encode_object(self, obj: torch.Tensor) -> torch.Tensor:
        """CLS after the final LayerNorm, (B, 1, D)."""
        return self.obj_vit_region_encoder(pixel_values=obj).last_hidden_state[:, :1, :]

    def encode_context(self, key: str, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final LayerNorm, (B, P, D); the context CLS is unused."""
        return self.img_vit_region_encoders[key](pixel_values=pixels).last_hidden_state[:, 1:, :]

    def embed(self, obj: torch.Tensor, contexts: Sequence[torch.Tensor],
              context_index: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """The vector the classifier head sees (B, D): the projected object and context features.
        `contexts[i]` holds scale i's inputs; where `context_index[i]` is given, contexts[i] has one
        row per distinct crop (the whole image, shared by an image's ROIs) and the index picks each
        ROI's row, so each distinct crop is encoded once."""
        cls = self.encode_object(obj)
        feats = [cls.flatten(1)]
        for i, key in enumerate(self.spec.env_keys):
            tokens = self.encode_context(key, contexts[i])
            if context_index is not None and context_index[i] is not None:
                tokens = tokens[context_index[i]]
            feats.append(self.intra_env_attn_module[key](cls, tokens).flatten(1))
        return self.concat_proj(torch.cat(feats, dim=1))

    def forward(self, obj: torch.Tensor, contexts: Sequence[torch.Tensor],
                context_index: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Logits (B, classes): the classifier head on `embed`."""
        return self.classifier(self.embed(obj, contexts, context_index))


# transformers 5 renamed DINOv2's attention projections; checkpoints use the 4.x names.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def to_checkpoint_name(module_key: str) -> str:
    for old, new in _RENAMES:
        module_key = module_key.replace(new, old)
    return module_key


def to_module_names(state_dict: Mapping[str, torch.Tensor], module_keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Checkpoint-named tensors renamed to this transformers version's module names."""
    by_ckpt = {to_checkpoint_name(k): k for k in module_keys}
    return {by_ckpt.get(k, k): v for k, v in state_dict.items()}


def check_keys(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointMismatch("checkpoint does not fit the architecture: " + "; ".join(parts))


def inference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Only the tensors inference reads (drops hierarchical heads and object projections)."""
    return {k: v for k, v in state_dict.items() if k.startswith(INFERENCE_PREFIXES)}
