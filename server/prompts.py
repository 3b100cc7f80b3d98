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
        return list(await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def decode(self, ids: list[int]) -> str:
        """Token ids back into text (a token-id prompt's text, for `echo`)."""
        return await self._run(self.tokenizer.decode, ids)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The chat template applied (a plain `role: content` fallback without one): by default with the
        assistant's turn opened; continue_final_message leaves the last message open instead; template_kwargs
        are extra template variables (checked by server.api.validation)."""
        self._check_length(sum(len(m["content"]) + len(m["role"]) for m in messages), "messages")
        options = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            **(template_kwargs or {}),
        }
        return await self._run(self._chat_ids, messages, options)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _chat_ids(self, messages: list[dict[str, str]], options: dict[str, Any]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            from jinja2.exceptions import TemplateError

            try:
                prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, **options)
            except TemplateError as e:  # templates raise on what they do not accept (roles, their order)
                raise BadRequestError(f"the model's chat template refused these messages: {e}", "messages") from e
            except ValueError as e:  # continue_final_message whose last message the template does not end with
                raise BadRequestError(f"the chat template cannot render these messages: {e}", "messages") from e
            except TypeError as e:  # a template variable of the wrong type, e.g. a number where it loops
                if len(options) == 2:  # no chat_template_kwargs: not the request's doing
                    raise
                raise BadRequestError(
                    f"the chat template cannot render with these chat_template_kwargs: {e}", "chat_template_kwargs"
                ) from e
        else:  # a plain fallback for tokenizers without a template
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if options["continue_final_message"]:
                prompt = prompt[:-1]
            elif options["add_generation_prompt"]:
                prompt += "assistant:"
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise RequestTooLargeError(
                f"the prompt is {chars} characters; this server takes at most {self.max_chars} (--max-prompt-chars)",
                param=param,
            )

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the tokenizer's worker thread (the tokenizer's own call there, no wrapper)."""
        return await asyncio.wrap_future(self._worker.submit(fn, *args, **kwargs))
