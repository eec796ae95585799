"""Sampling, `retro-jax sample`: generate text with RETRO, retrieving from the chunk database as
it goes, in the paper's order: when chunk C_u is complete, its text is embedded with the same
frozen BERT that keyed the database, the saved index is searched, and the neighbours' chunk +
continuation tokens condition the generation of chunk u+1 from the last token of C_u on.

    tokens.py    choosing the next token: nucleus / top-k at a temperature, or greedy
    live.py      live retrieval: LiveRetriever, RetrievedChunk, format_neighbours
    sampler.py   Sampler: loading a workdir, the decoding loop with its caches, prompts in batches
    command.py   prompt files, JSON-lines output and the command (`main`)

Python:
    from retro_jax.sample.sampler import Sampler
    sampler = Sampler.from_workdir(config, workdir)
    result = sampler.generate("The state of the Union", max_new_tokens=64, seed=0)
    result.text, result.tokens, result.chunks   # chunks: per chunk its retrieved neighbours,
                                                # their documents and what was copied from them
    results = sampler.generate_batch(["We the people", "Tonight"], max_new_tokens=64)
"""
