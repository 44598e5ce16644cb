"""Global deduplication as separate passes, so that no pass holds every image in memory
(NeMo Curator's shape: exact, fuzzy and semantic dedup as distinct stages):

1. signatures.py: per shard, in parallel on the shared executors (curate/job.py): SHA-256 of
   the image bytes, a perceptual hash, the pixel count and optionally a CLIP embedding, written
   as one signature shard per input shard;
2. grouping.py: exact duplicates by hash partitioning, near duplicates by LSH banding
   partitioned by band bucket, optional semantic duplicates (k-means + cosine threshold), one
   union-find over the edges; a keep-list and a dropped-list per shard, with a deterministic
   survivor rule;
3. apply: the ``dedup`` stage of filter_data (filters/dedup.py) reads those lists.
"""
