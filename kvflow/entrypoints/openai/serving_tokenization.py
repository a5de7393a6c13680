"""POST /tokenize and /detokenize: the server's own tokenizer, for clients that count tokens."""

from __future__ import annotations

from kvflow.entrypoints.openai.errors import APIError
from kvflow.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat


class OpenAIServingTokenization(OpenAIServingChat):
    """Shares the chat serving's template rendering, so /tokenize counts what chat would send."""

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.resolve_model(request.model)
        tokenizer = self.require_tokenizer("messages" if request.messages else "prompt")
        if (request.prompt is None) == (request.messages is None):
            raise APIError("Send exactly one of prompt (a string) or messages (a chat).", 400,
                           "prompt")
        if request.messages is not None:
            if not request.messages:
                raise APIError("messages is empty.", 400, "messages")
            ids = self.render(request.messages,
                              add_generation_prompt=request.add_generation_prompt,
                              continue_final_message=request.continue_final_message,
                              chat_template=None, template_kwargs=request.chat_template_kwargs)
            if request.add_special_tokens:
                ids = with_special_tokens(tokenizer, ids)
        else:
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = tokenizer.encode(request.prompt, add_special_tokens=add_special)
        strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len,
                                token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(request.model)
        tokenizer = self.require_tokenizer("tokens")
        self.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))


def with_special_tokens(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` wrapped in the special tokens the tokenizer adds to one sequence (BOS, EOS).

    transformers 5's fast tokenizers (``TokenizersBackend``) have no
    ``build_inputs_with_special_tokens``, so the wrapping is read off the tokenizer's own
    encoding of a one-word probe, with and without special tokens.
    """
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if build is not None:
        return list(build(list(ids)))
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start] + list(ids) + full[start + len(plain):]
    return list(ids)
