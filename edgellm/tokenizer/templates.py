"""Built-in conversation templates, written as data in MLC-LLM's field names and values.

Each entry is what MLC-LLM's gen_config writes under "conv_template" (role_templates default to the
plain placeholders and are filled in by `Conversation.from_dict`). MLC-LLM has no `internlm2`
template; ours follows InternLM2's own chat format (ChatML after a BOS, `<|im_end|>` = 92542).
"""

from __future__ import annotations

from typing import Any

_CHATML_ROLES = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
_CHATML_SYSTEM = "<|im_start|>system\n{system_message}<|im_end|>\n"
_LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"
_LLAMA_DEFAULT_SYSTEM = "You are a helpful, respectful and honest assistant."
_INTERNLM_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文."
)

BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    "chatml": {
        "system_template": _CHATML_SYSTEM,
        "system_message": "A conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        "roles": _CHATML_ROLES,
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>"],
        "stop_token_ids": [2],
    },
    "qwen2": {
        "system_template": _CHATML_SYSTEM,
        "system_message": "You are a helpful assistant.",
        "roles": _CHATML_ROLES,
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|endoftext|>", "<|im_end|>"],
        "stop_token_ids": [151643, 151645],
    },
    "llama-2": {
        "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        "system_message": _LLAMA_DEFAULT_SYSTEM,
        "system_prefix_token_ids": [1],
        "add_role_after_system_message": False,
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]", "tool": "[INST]"},
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": " ",
        "stop_str": ["[INST]"],
        "stop_token_ids": [2],
    },
    "llama-3": {
        "system_template": _LLAMA3_SYSTEM,
        "system_message": _LLAMA_DEFAULT_SYSTEM,
        "system_prefix_token_ids": [128000],
        "roles": {"user": "<|start_header_id|>user", "assistant": "<|start_header_id|>assistant"},
        "seps": ["<|eot_id|>"],
        "role_content_sep": "<|end_header_id|>\n\n",
        "role_empty_sep": "<|end_header_id|>\n\n",
        "stop_str": ["<|end_of_text|>", "<|eot_id|>"],
        "stop_token_ids": [128001, 128009],
    },
    "llama-3_1": {
        "system_template": _LLAMA3_SYSTEM,
        "system_message": _LLAMA_DEFAULT_SYSTEM,
        "system_prefix_token_ids": [128000],
        "roles": {
            "user": "<|start_header_id|>user",
            "assistant": "<|start_header_id|>assistant",
            "tool": "<|start_header_id|>ipython",
        },
        "seps": ["<|eot_id|>"],
        "role_content_sep": "<|end_header_id|>\n\n",
        "role_empty_sep": "<|end_header_id|>\n\n",
        "stop_str": [],
        "stop_token_ids": [128001, 128008, 128009],
    },
    "mistral_default": {
        "system_template": "[INST] {system_message}",
        "system_message": "Always assist with care, respect, and truth. Respond with utmost utility yet "
        "securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote "
        "fairness and positivity.",
        "system_prefix_token_ids": [1],
        "add_role_after_system_message": False,
        "roles": {"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"},
        "seps": [" "],
        "role_content_sep": " ",
        "role_empty_sep": "",
        "stop_str": ["</s>"],
        "stop_token_ids": [2],
    },
    "phi-3": {
        "system_template": "<|system|>\n{system_message}",
        "system_message": "You are a helpful digital assistant. Please provide safe, ethical and "
        "accurate information to the user.",
        "system_prefix_token_ids": [1],
        "roles": {"user": "<|user|>", "assistant": "<|assistant|>"},
        "seps": ["<|end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|endoftext|>"],
        "stop_token_ids": [2, 32000, 32001, 32007],
    },
    "gemma_instruction": {
        "system_template": "{system_message}",
        "system_message": "",
        "system_prefix_token_ids": [2],
        "roles": {"user": "<start_of_turn>user", "assistant": "<start_of_turn>model"},
        "seps": ["<end_of_turn>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<end_of_turn>"],
        "stop_token_ids": [1, 107],
    },
    "internlm2": {
        "system_template": _CHATML_SYSTEM,
        "system_message": _INTERNLM_SYSTEM,
        "system_prefix_token_ids": [1],
        "roles": _CHATML_ROLES,
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>"],
        "stop_token_ids": [2, 92542],
    },
    "redpajama_chat": {
        "system_template": "{system_message}",
        "system_message": "",
        "roles": {"user": "<human>", "assistant": "<bot>"},
        "seps": ["\n"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": ["<human>"],
        "stop_token_ids": [0],
    },
    "LM": {
        "system_template": "{system_message}",
        "system_message": "",
        "system_prefix_token_ids": [1],
        "roles": {"user": "", "assistant": ""},
        "seps": [""],
        "role_content_sep": "",
        "role_empty_sep": "",
        "stop_str": [],
        "stop_token_ids": [2],
    },
}
