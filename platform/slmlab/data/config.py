"""Typed configuration of the data stage: sources, mixture, partitions, packing, tokenizer.

YAML shape (every field optional except a non-embedded source's ``path``)::

    data:
      sources:
        - kind: text                 # embedded | text | jsonl | parquet | hf | hf_disk
          path: ../shared/data/tinyshakespeare/input.txt   # file, folder, glob, s3://…, gs://…
          doc_separator: blank_line  # text only: line | blank_line | file
          weight: 0.7                # share of TARGET tokens in the training mixture
        - kind: jsonl
          path: corpora/chat/*.jsonl
          format: chat               # text | chat (messages: [{role, content}] or prompt/response)
          weight: 0.3
      mixture_strategy: subsample    # subsample (use each doc at most once) | upsample (repeat small sources)
      partition: {method: topic, num_partitions: 4}   # random | topic | curriculum; default: none
      seq_len: 256
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from slmlab.schema import StrictConfig as Strict

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "http://", "https://")
_GLOB = re.compile(r"[*?\[]")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


class SourceConfig(Strict):
    kind: Literal["embedded", "text", "jsonl", "parquet", "hf", "hf_disk"] = "embedded"
    # file, folder or glob (text/jsonl/parquet), a cloud URI (s3://, gs://; text/jsonl/parquet, read by
    # Ray Data's own readers), a save_to_disk folder (hf_disk) or a dataset name / local folder (hf)
    path: str | None = None
    format: Literal["text", "chat"] = "text"  # chat: instruction records rendered with the chat template
    text_field: str = "text"  # column holding the document text (format text; jsonl/parquet/hf/hf_disk)
    messages_field: str = "messages"  # format chat: list of {role, content} (or ShareGPT {from, value})
    prompt_field: str = "prompt"  # format chat: records without messages_field use a prompt/response pair
    response_field: str = "response"
    system_field: str | None = None  # format chat, prompt/response records: optional system message column
    id_field: str | None = None  # column with a document id (default: file:line, or dataset:row)
    score_field: str | None = None  # per-document difficulty for curriculum partitions (partition.score: field)
    # text only. What a document is in a plain-text file: `line` = every non-blank line; `blank_line`
    # (default) = paragraphs separated by one or more blank (whitespace-only) lines, joined with "\n";
    # `file` = the whole file
    doc_separator: Literal["line", "blank_line", "file"] | None = None
    weight: float = Field(1.0, gt=0)  # relative share of this source in the mixture's target tokens
    split: str = "train"  # split name for hf sources
    subset: str | None = None  # hf: dataset configuration name
    revision: str | None = None  # hf: git revision (part of the cache key: pin it for reproducibility)
    streaming: bool = True  # hf: stream instead of downloading the whole dataset first
    max_documents: int | None = Field(None, gt=0)  # cap on usable documents per source, for quick experiments

    @model_validator(mode="after")
    def _checks(self) -> "SourceConfig":
        if self.kind != "embedded" and not self.path:
            raise ValueError(f"a {self.kind!r} source needs 'path'")
        if self.doc_separator is not None and self.kind != "text":
            raise ValueError(f"expected doc_separator only on 'text' sources, found it on a {self.kind!r} source")
        if self.format == "chat" and self.kind == "text":
            raise ValueError(
                f"expected format 'chat' only on embedded/jsonl/parquet/hf/hf_disk sources, found kind {self.kind!r}"
            )
        if self.path and is_remote(self.path):
            if self.kind not in ("text", "jsonl", "parquet"):
                raise ValueError(f"expected a cloud URI only for text/jsonl/parquet sources, found kind {self.kind!r}")
            if _GLOB.search(self.path):
                raise ValueError(f"expected a cloud file or folder URI without wildcards, found {self.path!r}")
        return self

    @property
    def separator(self) -> str:
        return self.doc_separator or "blank_line"


class PartitionConfig(Strict):
    """Split the documents into N disjoint partitions (for independently trained experts)."""

    method: Literal["random", "topic", "curriculum"]
    num_partitions: int = Field(ge=2, le=256)
    # curriculum: `length` = target tokens per document; `field` = each source's score_field.
    # Partition 0 holds the easiest (lowest-score) documents; partitions hold equal token counts.
    score: Literal["length", "field"] = "length"
    topic_sample_documents: int = Field(20_000, ge=10)  # topic: documents the TF-IDF + k-means model is fitted on
    topic_max_features: int = Field(32_768, ge=16)  # topic: TF-IDF vocabulary size
    # topic: a partition holds at most (1 + slack) x its equal share of training bytes (c-BTM's balanced
    # k-means); null = plain k-means, which on small corpora leaves near-empty clusters (see data/topics.py)
    topic_balance_slack: float | None = Field(0.1, ge=0)


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig()], min_length=1)
    # how the weights are met: `subsample` uses every document at most once and samples the other
    # sources down to the one that runs out first; `upsample` repeats documents of small sources
    mixture_strategy: Literal["subsample", "upsample"] = "subsample"
    partition: PartitionConfig | None = None  # default: one undivided dataset
    seq_len: int = Field(256, ge=8)  # tokens the model sees per example; blocks hold seq_len + 1 (targets shift)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)  # documents held out (split by document, so no block straddles)
    # documents per tokenizer call in the Ray Data actors; blocks hold 4 calls' worth. Ray's cost is per block:
    # at 64 MB on 2 CPUs, 2,048 built shards 1.16x faster than 512 (best of 3 interleaved; 1.20x by the median)
    tokenize_batch_size: int = Field(2048, ge=1)
    # documents per packing batch; each (split, partition) pads at most one block per batch
    pack_batch_size: int = Field(8192, ge=1)
    tokenize_concurrency: int = Field(2, ge=1)  # most tokenizer actors; each takes half a CPU so reads are not starved
    shuffle_buffer: int = Field(256, ge=0)  # rows in the per-worker shuffle buffer (0 = file order)

    @model_validator(mode="after")
    def _checks(self) -> "DataConfig":
        if self.partition and self.partition.score == "field" and self.partition.method == "curriculum":
            missing = [i for i, s in enumerate(self.sources) if not s.score_field]
            if missing:
                raise ValueError(
                    f"expected score_field on every source for partition.score 'field', found none on sources {missing}"
                )
        return self


class TokenizerConfig(Strict):
    vocab_size: int = Field(16384, ge=300)  # byte-level BPE: 256 byte symbols + merges + specials
    sample_bytes: int = Field(50_000_000, ge=1000)  # bounded training sample, drawn from every source by weight
    min_frequency: int = Field(2, ge=1)  # merges seen fewer times are noise on small corpora
    # also train on the distinct caption/question/answer lines of every vlm_train stage's training images, so
    # their words ("circle", "bottom", "red") are whole tokens wherever they occur
    image_text: bool = True
