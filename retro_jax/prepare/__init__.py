"""The offline pipeline, `retro-jax prepare`: raw text -> the neighbour records that training,
evaluation and sampling read, as resumable stages in W/prepare (or `data.prepare_dir`).

                                 +--> chunks --> keys --> index --+
    sources --> dedup --> tokenizer                               +--> neighbours
                                 +--> sequences ------------------+

    dedup       dedup_report.json      leakage filter of train/retrieval docs vs eval docs
    tokenizer   tokenizer/             SentencePiece trained on the training docs (or a given one)
    chunks      db/                    chunk database (chunk + continuation, doc ids), sharded
    keys        keys/                  frozen-BERT key of every database chunk, per shard
    index       index/                 NeighbourIndex over all keys
    sequences   sequences/             train and eval documents cut into sequences
    neighbours  {train,eval}-*.tfrecord, records.json   the records training and eval read
                eval_query_keys.npz    a cache, not an output: the eval chunks' BERT keys

Besides the arrows: dedup's report also filters the documents that chunks and sequences read,
and the neighbours stage also reads the database entries (chunks), their stored keys (keys) and
the tokenizer. `run.DEPENDS` holds these edges; a stage is rebuilt when anything it reads
changes.

    run.py      the local driver: manifest, `<stage>.partial/` folders, resume (`run_prepare`)
    stages.py   per stage: the settings it hashes, its outputs, its commit (`StageContext`)
    builds.py   how each stage is built from the stage modules (`StageBuilds`)
    dedup.py    the 13-gram MinHash leakage filter
    beam/       the same stages as Apache Beam pipelines (`prepare --runner=...`)

The work of each stage lives in `retro_jax.data` (sources, tokenizer, sequences, records) and
`retro_jax.retrieval` (chunks, keys, index, neighbours); this package runs it in order.
"""
