"""Data stage: sources → tokenizer → Ray Data tokenize + pack → parquet shards (cached).

``build_shards(cfg) -> Shards`` is the one entry point (:mod:`slmlab.data.shards`). A pipeline's
``data:`` section (:mod:`slmlab.data.config`)::

    data:
      sources:                      # one or more; mixed by weight
        - kind: text                # local file / folder / glob, or s3:// gs:// (Ray Data readers)
          path: corpora/books/*.txt
          doc_separator: blank_line # line | blank_line (default: paragraphs) | file
          weight: 3                 # share of *target tokens* in the training mixture
        - kind: jsonl               # also: parquet, hf (dataset name; streamed), hf_disk (save_to_disk), embedded
          path: corpora/wiki/
          text_field: body
        - kind: jsonl
          path: corpora/sft.jsonl
          format: chat              # {messages: [{role, content}]} or {prompt, response}: loss on answers only
      mixture_strategy: subsample   # or upsample (repeat small sources instead of dropping from big ones)
      partition: {method: topic, num_partitions: 4}   # random | topic | curriculum → train/part-KKK/
      seq_len: 256

What each piece decides, and where it is documented:
  * what a document is, bad-record accounting: :mod:`slmlab.data.sources`
  * chat template and loss masks: :mod:`slmlab.data.chat`
  * packing (EOS-separated, one-token overlap, examples never split): :mod:`slmlab.data.packing`
  * mixture weights and partitions: :mod:`slmlab.data.mixture`, :mod:`slmlab.data.topics`
  * cache layout, provenance summary, MLflow metrics: :mod:`slmlab.data.shards`
"""
