"""Quality filters and deduplication for recaptioned (or plain img2dataset) WebDataset shards.

One small class per filter, each with a dataclass config, in NeMo Curator's stage shape: a
stage takes one sample and returns None (keep) or a Reject (reason, detail). pipeline.py reads
the shards in input order, runs the stages, writes kept samples and rejects, and the report.
See docs/curation.md ("Filter and deduplicate").
"""
