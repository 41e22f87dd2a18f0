"""The model's tokenizer: tokenizer.json through the `tokenizers` library, plus tokenizer_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from edgellm.errors import UserError
from edgellm.tokenizer.jinja import ChatTemplate

_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


# tokenizer_config.json writes a special token as a string or as an AddedToken object.
def _token_string(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from e


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
        return template if isinstance(template, str) else None
    return None


def _find_chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _pick_chat_template(config.get("chat_template"))
    if template is None and (model_dir / "chat_template.json").is_file():
        data = _read_json(model_dir / "chat_template.json")
        template = _pick_chat_template(data.get("chat_template") if isinstance(data, Mapping) else None)
    return template


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.special_tokens: dict[str, str] = {
            k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)
        }
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template: str | None = chat_template
        self._chat_template_compiled: ChatTemplate | None = None
        added = backend.get_added_tokens_decoder()
        special = {i for i, tok in added.items() if tok.special}
        for name in _SPECIAL_NAMES:
            token_id = self._special_id(name)
            if token_id is not None:
                special.add(token_id)
        self.special_ids: frozenset[int] = frozenset(special)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json (required) and tokenizer_config.json / chat_template.jinja (optional)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from e
        config_path = model_dir / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, Mapping):
            raise UserError(f"{config_path}: expected a JSON object")
        return cls(
            backend,
            special_tokens={name: _token_string(config.get(name)) for name in _SPECIAL_NAMES},
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=_find_chat_template(model_dir, config),
        )

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the BOS token named in tokenizer_config.json, if any."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the EOS token named in tokenizer_config.json, if any."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token named in tokenizer_config.json, if any."""
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token named in tokenizer_config.json, if any."""
        return self._special_id("unk_token")

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (as in the vocabulary, e.g. "Ġthe" or "<0xE4>"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of a token id, or None if out of range."""
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. "<|im_start|>") become their ids.

        With `add_special_tokens`, the tokenizer's post-processor runs and BOS/EOS are added when
        tokenizer_config.json asks for them (add_bos_token / add_eos_token).
        """
        ids = list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
            if self.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        return ids

    def encode_prompt(self, parts: Sequence[str | Sequence[int]]) -> list[int]:
        """Token ids of a rendered prompt (`conversation.render` output): strings are encoded without
        special tokens, token-id lists are copied as they are, all in order."""
        ids: list[int] = []
        for part in parts:
            ids.extend(self.encode(part) if isinstance(part, str) else (int(i) for i in part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens are left out unless `skip_special_tokens` is False."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Any], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render messages with the model's own jinja chat template (`--conv-template auto`)."""
        if self.chat_template is None:
            raise UserError(
                "this model has no chat_template in tokenizer_config.json; choose a --conv-template by name"
            )
        if self._chat_template_compiled is None:
            self._chat_template_compiled = ChatTemplate(self.chat_template, self.special_tokens)
        template = self._chat_template_compiled
        return template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
