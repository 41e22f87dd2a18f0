"""mlc-chat-config.json: what gen_config writes and every runtime reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgellm.errors import UserError

CHAT_CONFIG = "mlc-chat-config.json"
VERSION = "0.1.0"


@dataclass
class ChatConfig:
    model_type: str
    quantization: str
    model_config: dict
    vocab_size: int
    context_window_size: int = 4096
    sliding_window_size: int = -1
    prefill_chunk_size: int = 2048
    attention_sink_size: int = -1
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    max_batch_size: int = 128
    temperature: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off (MLC's config has no top_k; gen_config writes llama.cpp's default)
    min_p: float = 0.0
    conv_template: dict | str = "LM"
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tokenizer_files: list[str] = field(default_factory=list)
    # what differs from the quantization's default layout: {"group_size": 0|64|128, "lm_head_bits": 4|8|16}
    quantization_layout: dict = field(default_factory=dict)
    tokenizer_info: dict = field(default_factory=dict)
    version: str = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = CHAT_CONFIG) -> ChatConfig:
        """A chat config from its JSON, validated first (one-line UserError naming `source`)."""
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise UserError(f"{source}: must be a JSON object, not {type(d).__name__}")
        missing = [k for k in ("model_type", "quantization", "model_config") if k not in d]
        if missing:
            raise UserError(f"{source} lacks {missing[0]!r}")
        from edgellm.validation import validate

        validate(_schema(), d, source)
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.setdefault("vocab_size", d["model_config"].get("vocab_size", 0))
        return cls(**kwargs)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, list) else [e]

    def save(self, out_dir: Path) -> Path:
        path = out_dir / CHAT_CONFIG
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def load_chat_config(model_dir: Path) -> ChatConfig:
    path = model_dir / CHAT_CONFIG
    if not path.exists():
        raise UserError(f"{model_dir} has no {CHAT_CONFIG} (run `edgellm gen_config` first)")
    try:
        return ChatConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def _schema():
    """The pydantic model of mlc-chat-config.json (built on first use: pydantic stays off `edgellm --help`)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    from edgellm.validation import Int, Num

    token = Int(0, (1 << 24) - 1)

    class ChatConfigSchema(BaseModel):
        model_config = ConfigDict(extra="allow", protected_namespaces=())
        model_type: str
        quantization: str
        model_config_: dict = Field(alias="model_config")
        vocab_size: Int(1, 1 << 24) | None = None
        context_window_size: Int(-1, 1 << 24) = 4096
        sliding_window_size: Int(-1, 1 << 24) = -1
        prefill_chunk_size: Int(1, 1 << 24) = 2048
        attention_sink_size: Int(-1, 1 << 24) = -1
        tensor_parallel_shards: Int(1, 1024) = 1
        pipeline_parallel_stages: Int(1, 1024) = 1
        max_batch_size: Int(1, 1 << 16) = 128
        temperature: Num(ge=0.0, le=100.0) = 1.0
        presence_penalty: Num(ge=-2.0, le=2.0) = 0.0
        frequency_penalty: Num(ge=-2.0, le=2.0) = 0.0
        repetition_penalty: Num(0.0, 100.0) = 1.0
        top_p: Num(0.0, 1.0) = 1.0
        conv_template: dict | str = "LM"
        pad_token_id: Int(-1, (1 << 24) - 1) | None = 0
        bos_token_id: token | None = None
        eos_token_id: token | list[token] | None = None
        tokenizer_files: list[str] = []
        tokenizer_info: dict = {}

        @model_validator(mode="after")
        def _consistent(self):
            if self.context_window_size == 0:
                raise ValueError("context_window_size must be positive (or -1 for unbounded)")
            vocab = self.vocab_size or self.model_config_.get("vocab_size")
            eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
            for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos)):
                bad = [i for i in ids if i is not None and isinstance(vocab, int) and i >= vocab]
                if bad:
                    raise ValueError(f"{name} {bad[0]} is outside the vocabulary (vocab_size {vocab})")
            return self

    return ChatConfigSchema
