"""Prompts into token ids, off the event loop.

    ids = await prompts.encode(text)              # /generate, /v1/completions
    ids = await prompts.chat(messages)            # /v1/chat/completions: the chat template, then encode

The prompt's length is checked before any tokenizing (413 past --max-prompt-chars), and the tokenizer runs on
one worker thread of its own: a long prompt never stalls the event loop (health checks, streams), and calls
are never concurrent (Hugging Face fast tokenizers may refuse concurrent use from several threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from server.errors import BadRequestError, RequestTooLargeError

T = TypeVar("T")


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_chars: int) -> None:
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plugmoe-tokenize")

    async def encode(self, text: str, *, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        self._check_length(len(text), param)
        return await self._run(lambda: list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)))

    async def decode(self, ids: list[int]) -> str:
        """Token ids back into text (a token-id prompt's text, for `echo`)."""
        return await self._run(lambda: self.tokenizer.decode(ids))

    async def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied with a generation prompt (a plain `role: content` fallback without one)."""
        self._check_length(sum(len(m["content"]) + len(m["role"]) for m in messages), "messages")
        return await self._run(lambda: self._chat_ids(messages))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            from jinja2.exceptions import TemplateError

            try:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:  # templates raise on what they do not accept (roles, their order)
                raise BadRequestError(f"the model's chat template refused these messages: {e}", "messages") from e
        else:  # a plain fallback for tokenizers without a template
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise RequestTooLargeError(
                f"the prompt is {chars} characters; this server takes at most {self.max_chars} (--max-prompt-chars)",
                param=param,
            )

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._worker.submit(fn))
