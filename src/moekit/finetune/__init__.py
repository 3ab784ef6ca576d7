"""Supervised fine-tuning: chat data with the loss on the assistant tokens, LoRA adapters
(models/lora.py) exported for PEFT, the embedded instruction set and the Flan-MoE demo.

    result = finetune("runs/compare-.../moe", "chats.jsonl", "runs/sft", {"lora.rank": "8"})
"""

from .chat import DEFAULT_TEMPLATE, ChatTemplate, Conversation, read_conversations
from .data import InstructionData, pad_batch
from .job import FinetuneConfig, FinetuneResult, finetune, load_base

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatTemplate",
    "Conversation",
    "FinetuneConfig",
    "FinetuneResult",
    "InstructionData",
    "finetune",
    "load_base",
    "pad_batch",
    "read_conversations",
]
