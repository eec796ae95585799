"""`retro-jax prepare --runner=...`: the prepare stages as Apache Beam pipelines.

    documents.py   sources read part by part in parallel; rows put back in the local order
    dedup.py       distributed MinHash LSH (bands as keys) and the Jaccard check
    database.py    chunk database, keys (BERT once per worker), index shards
    neighbours.py  sequences; queries fanned out to index shards, merged, written as records
    stages.py      BeamStageContext: the local driver's stages, built by these pipelines

Needs the `beam` extra (`pip install -e '.[beam]'`); only `run_prepare` with a runner imports it.
"""
