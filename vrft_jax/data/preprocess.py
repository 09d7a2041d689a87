"""One record -> one model-ready example: chat template, image patches, expanded image tokens, M-RoPE ids.

Runs inside the Grain pipeline (in worker processes when there are any), once per record. Outputs are
compact (the record's own length and patch count); `batching` pads them into the static buckets.
A record that cannot become an example raises `BadRecordError` naming it, or, in lenient mode, comes
out as a `Rejected` marker that the batcher counts. Nothing is ever truncated: a prompt whose image
tokens do not fit the text bucket is a bad record, not a shorter prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from vrft_jax.data import image as image_lib
from vrft_jax.data import prompts
from vrft_jax.data import records as rec
from vrft_jax.models.qwen2_vl import rope
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.rewards.frames import frame_of


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded record, unpadded.

    input_ids:  int32[L], the rendered prompt with `<|image_pad|>` expanded to the image's tokens
    positions:  int32[L, 3] M-RoPE (time, row, column) ids
    rope_delta: the token at valid index k >= L (the generated ones) sits at position k + rope_delta
    pixels:     uint8[N, C, p*p] the resized image's pixels in HF's patch order, N = t*h*w
                (normalised into the batch by `image.write_patches`)
    grid_thw:   (t, h, w) patch grid
    meta:       host-only columns (see `batching.META_COLUMNS`)
    """

    input_ids: np.ndarray
    positions: np.ndarray
    rope_delta: int
    pixels: np.ndarray
    grid_thw: tuple[int, int, int]
    meta: dict[str, Any]


class _Prompt(NamedTuple):
    """A record's rendered prompt and its image, opened (header read, pixels not decoded)."""

    problem: str
    ids: list[int]  # the prompt with its one unexpanded <|image_pad|>
    slot: int  # where that token is
    image: Any
    source_hw: tuple[int, int]
    num_patches: int
    num_tokens: int  # image tokens (patches merged)
    length: int  # prompt tokens, image tokens included


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class ExampleEncoder:
    """Callable `(index, record) -> Example | Rejected`; picklable, so it can run in Grain workers.
    `PADDING` passes through.

    Args:
      tokenizer: a Qwen2-VL tokenizer (`vrft_jax.models.qwen2_vl.tokenizer.load_tokenizer`).
      model_config: the `Qwen2VLConfig` whose vision geometry and image token id the examples follow.
      max_prompt_len: the text bucket T; prompts longer than this (image tokens included) are bad records.
      patch_bucket: the patch bucket P; images with more patches are bad records.
      source: names the data in error messages.
      system_prompt: None for Visual-RFT training (the chat template adds "You are a helpful assistant.").
      problem_prefix: put before every problem (Visual-RFT's evaluation uses "<image>\n").
      box_frame: the frame a detection problem asks boxes in (`prompts.in_frame`); None = the model family's.
    """

    def __init__(self, tokenizer, model_config: Qwen2VLConfig, *, min_pixels: int, max_pixels: int, max_prompt_len: int,
                 patch_bucket: int, on_bad_record: str = "error", source: str = "data",
                 system_prompt: str | None = None, problem_prefix: str = "", chat_template: str | None = None,
                 box_frame: str | None = None):
        self.tokenizer = tokenizer
        self.geometry = image_lib.ImageGeometry.from_model(model_config, min_pixels=min_pixels,
                                                            max_pixels=max_pixels)
        self.patches = image_lib.PatchEncoder(self.geometry)
        self.image_token_id = int(model_config.image_token_id)
        tokenizer_image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if tokenizer_image_id != self.image_token_id:
            raise ValueError(f"the tokenizer's <|image_pad|> is id {tokenizer_image_id} but the model config's "
                             f"image_token_id is {self.image_token_id}")
        self.max_prompt_len, self.patch_bucket = int(max_prompt_len), int(patch_bucket)
        self.on_bad_record = rec.check_policy(on_bad_record)
        self.source, self.system_prompt, self.problem_prefix = source, system_prompt, problem_prefix
        self.box_frame = frame_of(box_frame or model_config.family)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or _default_chat_template()

    def __call__(self, item: tuple[int, Mapping[str, Any]] | rec.Padding) -> Example | rec.Rejected | rec.Padding:
        if isinstance(item, rec.Padding):
            return item
        index, record = item
        try:
            return self.encode(record, index)
        except _Bad as bad:
            where = rec.describe(rec.text_field(record, "id", errors="replace"), index, self.source)
            if self.on_bad_record == "error":
                raise rec.BadRecordError(where, bad.reason, bad.detail) from None
            return rec.Rejected(where, bad.reason, bad.detail)

    def prompt_ids(self, problem: str) -> list[int]:
        """Token ids of the rendered chat prompt with its single, unexpanded `<|image_pad|>`."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.chat_template)
        # The Rust tokenizer directly: the Python wrapper re-applies padding/truncation settings on every
        # call, which races between the pipeline's reader threads. Same ids (the HF parity test checks).
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def size(self, record: Mapping[str, Any]) -> tuple[int, int] | None:
        """(prompt tokens with the image's, image patches) of a record from its text and its image's header
        alone (no pixel is decoded), whatever the buckets; None for a record that cannot become an example
        for another reason (the pipeline reports it by its policy)."""
        try:
            prompt = self._prompt(record)
        except _Bad:
            return None
        return prompt.length, prompt.num_patches

    def _prompt(self, record: Mapping[str, Any]) -> _Prompt:
        error = rec.record_error(record)
        if error:
            raise _Bad(*error)
        problem = self.problem_prefix + prompts.in_frame(rec.text_field(record, "problem"), self.box_frame)
        ids = self.prompt_ids(problem)
        slots = [k for k, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != 1:  # the problem text itself spelled out an <|image_pad|>
            raise _Bad(rec.BAD_PROMPT, f"the rendered prompt has {len(slots)} <|image_pad|> tokens, expected 1")

        data = record["image"]
        data = data.item() if isinstance(data, np.ndarray) else data
        try:  # the header alone gives the size, so an over-long prompt is rejected before decoding
            image = image_lib.open_image(data)
            source_hw = (image.height, image.width)
            grid = self.geometry.grid_thw(*source_hw)
        except image_lib.ImageError as e:
            raise _Bad(rec.BAD_IMAGE, str(e)) from None
        num_patches = int(np.prod(grid))
        num_tokens = num_patches // self.geometry.merge_tokens
        return _Prompt(problem, ids, slots[0], image, source_hw, num_patches, num_tokens, len(ids) - 1 + num_tokens)

    def encode(self, record: Mapping[str, Any], index: int) -> Example:
        problem, ids, slot, image, source_hw, num_patches, num_tokens, length = self._prompt(record)
        if num_patches > self.patch_bucket:
            raise _Bad(rec.TOO_MANY_PATCHES, f"image {source_hw[0]}x{source_hw[1]} makes {num_patches} patches, "
                                             f"more than the patch bucket of {self.patch_bucket}")
        if length > self.max_prompt_len:
            raise _Bad(rec.PROMPT_TOO_LONG, f"prompt is {length} tokens ({num_tokens} image tokens), more than "
                                            f"max_prompt_len {self.max_prompt_len}")
        try:
            pixels, grid = self.patches.pixel_blocks(image_lib.to_rgb(image))
        except image_lib.ImageError as e:
            raise _Bad(rec.BAD_IMAGE, str(e)) from None

        input_ids = np.asarray(ids[:slot] + [self.image_token_id] * num_tokens + ids[slot + 1:], np.int32)
        positions, delta = rope.rope_positions(input_ids, np.asarray([grid]), merge=self.geometry.merge_size,
                                               image_token_id=self.image_token_id)
        patch = self.geometry.patch_size
        meta = {
            "id": rec.text_field(record, "id"),
            "index": int(index),
            "task": rec.text_field(record, "task"),
            "label": rec.text_field(record, "label"),
            "problem": problem,
            "solution": rec.text_field(record, "solution"),
            "image_hw": (grid[1] * patch, grid[2] * patch),
            "source_hw": source_hw,
        }
        return Example(input_ids=input_ids, positions=positions.T.astype(np.int32), rope_delta=int(delta),
                       pixels=pixels, grid_thw=grid, meta=meta)


def _default_chat_template() -> str:
    # Imported only when needed: the processor module pulls in torch through transformers' processors.
    from vrft_jax.models.qwen2_vl.tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE
