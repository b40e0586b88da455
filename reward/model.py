"""Reward-model actor: an HF sequence-classification model (one logit) scoring prompt + response.

The class is plain Python; the pipeline wraps it with `ray.remote` when it creates replicas, so the
same class is usable (and testable) without Ray.
"""

from __future__ import annotations

import torch


class RewardModelActor:
    """Loads `AutoModelForSequenceClassification` (num_labels=1) and scores texts in batches."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Right padding keeps every real token's position the same as when scored alone.
        self.tokenizer.padding_side = "right"
        # Keep the end of the response when a text is too long: that is what the model judges.
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"reward model {path}: tokenizer has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fallback
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        # Sequence classifiers pool the last non-pad token, found through config.pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        # Chat-templated prompts often start with the BOS text already; don't add a second one.
        probe = self.tokenizer("a")["input_ids"]
        bos = self.tokenizer.bos_token
        self._strip_bos = bos if bos and probe and probe[0] == self.tokenizer.bos_token_id else None

    def ready(self) -> bool:
        return True

    def _text(self, prompt: str, response: str) -> str:
        text = prompt + response
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One float per (prompt, response) pair, the model's single logit."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores
