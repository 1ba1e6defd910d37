"""The contract every encoder implements: token ids in, hidden states out."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of fillmask encoders.

    An encoder owns its token embedding (objectives tie their output layers to it) and maps
    ``input_ids`` of shape (B, T) to hidden states of shape (B, T, hidden_size).
    Subclasses expose ``vocab_size``, ``hidden_size`` and ``max_positions`` as attributes, and
    may expose ``norm_eps``, the LayerNorm epsilon objectives then give their heads (transformers
    heads use their encoder's; without it heads use BERT's 1e-12).

    The arguments a subclass was built with are recorded automatically, so a checkpoint can
    rebuild the encoder without the YAML that made it (see :meth:`spec`).
    """

    vocab_size: int
    hidden_size: int
    max_positions: int
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named sizes for :meth:`preset`; every encoder has at least ``tiny`` (tests)."""
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    """Options that change what the encoder computes, each applied on top of ``tiny``: the
    registry tests export (and import back) every one of them with every head."""
    EMBEDDING_ROLES: ClassVar[tuple[str, ...]] = ("tokens", "positions", "token_types")
    transformers_mapping: ClassVar[str | None] = None
    """The module (``"package.module"``) that maps this encoder to transformers and back,
    beside the model; see :mod:`fillmask.architectures.transformers_format` for what it
    defines. None: the encoder neither exports nor imports."""
    transformers_model_types: ClassVar[tuple[str, ...]] = ()
    """The transformers ``model_type`` values its mapping's ``from_transformers`` imports."""
    phase_options: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that may change during training without new weights (ModernBERT's
    rotary bases at its context extension): a phase of :class:`fillmask.phases.Phases` sets
    them with :meth:`set_options`. Each must be an attribute that ``forward`` reads."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Encoder, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = {k: v for k, v in bound.arguments.items() if k != "self"}
            # The outermost subclass finishes last, so its arguments win.
            object.__setattr__(self, "_init_args", recorded)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: enough to rebuild this encoder."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": dict(getattr(self, "_init_args", {})),
        }

    def set_options(self, **options: Any) -> None:
        """Change some :attr:`phase_options` in place; :meth:`spec` (and so checkpoints and
        exports) records the new values."""
        self.check_phase_options(options)
        for name, value in options.items():
            setattr(self, name, value)
            self._init_args[name] = value

    @classmethod
    def check_phase_options(cls, names: Any) -> None:
        """A ``ValueError`` naming the options in ``names`` that are not :attr:`phase_options`."""
        unknown = sorted(set(names) - set(cls.phase_options))
        if unknown:
            allowed = ", ".join(cls.phase_options) or "none"
            raise ValueError(f"{cls.__name__} cannot change {', '.join(unknown)} during "
                             f"training (options a phase may change: {allowed})")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Encoder:
        """Build a named size of :attr:`presets`, overriding any argument."""
        if name not in cls.presets:
            raise ValueError(f"preset {name!r} is unknown; use one of {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    def token_embedding(self) -> nn.Embedding:
        """The input token embedding, to which MLM decoders tie their weights."""
        return self.embedding_tables()["tokens"]

    def embedding_tables(self) -> dict[str, nn.Module]:
        """The input embedding tables by role: ``tokens`` always, then whichever of
        ``positions`` and ``token_types`` the architecture has. ELECTRA's generator and
        discriminator share these (see :meth:`set_embedding_table`).

        The default finds them as attributes of an ``embeddings`` submodule named by role
        (``embeddings.tokens``, ...); encoders laid out otherwise override both methods.
        """
        embeddings = getattr(self, "embeddings", None)
        if embeddings is None:
            raise NotImplementedError(f"{type(self).__name__} has no `embeddings` module; "
                                      "override embedding_tables and set_embedding_table")
        tables = {role: getattr(embeddings, role, None) for role in self.EMBEDDING_ROLES}
        return {role: table for role, table in tables.items() if table is not None}

    def set_embedding_table(self, role: str, table: nn.Module) -> None:
        """Replace the table of ``role`` (a key of :meth:`embedding_tables`) with ``table``, an
        ``nn.Embedding`` or a module with the same ``weight`` and call signature."""
        roles = self.embedding_tables()
        if role not in roles:
            raise KeyError(f"{type(self).__name__} has no {role!r} embedding; roles: "
                           f"{sorted(roles)}")
        setattr(self.embeddings, role, table)

    def resized(self, **changes: Any) -> Encoder:
        """A fresh encoder of this class with some constructor arguments changed.

        ELECTRA builds its generator with ``resized(hidden_size=..., intermediate_size=...,
        num_heads=..., num_layers=..., embedding_size=...)``; encoders whose constructors name
        these arguments differently override this.
        """
        return type(self)(**{**self.spec()["init_args"], **changes})

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        The default counts 6 FLOPs per weight of every matrix outside the embeddings; encoders
        add their attention term (see :class:`~fillmask.architectures.bert.BertEncoder`).
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        matrices = (p for p in self.parameters() if p.ndim >= 2 and id(p) not in embeddings)
        weights = sum(p.numel() for p in matrices)
        return 6.0 * weights

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode ``input_ids`` (B, T).

        ``attention_mask`` (B, T) is True on real tokens. Document-packed batches add
        ``position_ids`` (B, T), restarting at 0 in each document, and ``document_ids`` (B, T)
        (-1 on padding): a token attends only to tokens of its own document.
        """
        raise NotImplementedError

    def selected_states(self, input_ids: torch.Tensor, selected: torch.Tensor,
                        **inputs: torch.Tensor | None) -> torch.Tensor:
        """The hidden states of the tokens ``selected`` (B, T, boolean) marks, as (K, C) in
        row-major order: what an MLM loss decodes. Equal to ``self(input_ids, **inputs)
        [selected]``, which this default computes; encoders may skip work only the other
        tokens' states need (BertEncoder runs its last block's output projection and
        feed-forward on the selected tokens alone)."""
        return self(input_ids, **inputs)[selected]


def normal_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation, for ``encoder.apply``: linear and embedding weights from
    N(0, std), linear biases zero (norms keep their defaults)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The fields of a collated batch that encoders take, by keyword."""
    keys = ("attention_mask", "token_type_ids", "position_ids", "document_ids")
    return {key: batch.get(key) for key in keys}


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) True on real tokens: the attention mask, else non-padding document ids."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    if batch.get("document_ids") is not None:
        return batch["document_ids"] >= 0
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def count_real_tokens(batch: object) -> torch.Tensor | int:
    """Real (non-padding) tokens of a collated batch: a device tensor when the batch has
    padding (no host sync), else an int; 0 for anything that is not such a batch."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return 0
    if batch.get("attention_mask") is None and batch.get("document_ids") is None:
        return batch["input_ids"].numel()
    return real_tokens(batch).sum()


def pairwise_mask(
    attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean attention mask for ``scaled_dot_product_attention``: (B, 1, 1, T) from padding,
    or (B, 1, T, T) block-diagonal from document ids (padding forms its own block, so no row
    is empty)."""
    if document_ids is not None:
        return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    if attention_mask is not None:
        return attention_mask.bool()[:, None, None, :]
    return None
