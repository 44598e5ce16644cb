"""Data curation for SAIL-Caption: recaption at scale (docs/curation.md).

Stages in NeMo Curator's shape: a reader turns an input shard into samples, a caption stage
runs a backend over them, a writer puts one output shard per input shard; an executor (local
or Ray) runs that per-shard work.
"""
