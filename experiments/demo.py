"""`retro-jax demo`: the whole system on a real corpus, in minutes on a CPU.

    retro-jax demo --workdir W                          # transformers' model code, ~15 min*
    retro-jax demo --workdir W --config experiments/demo.py:smallest   # the CI test's size
    retro-jax demo --workdir W --config experiments/demo.py:large      # more files and steps
    retro-jax demo --workdir W --config experiments/demo.py:sotu       # State of the Union
    retro-jax demo --workdir W --config experiments/demo.py:sotu,large # all of it, ~35 min
    retro-jax demo --workdir W --config experiments/demo.py:linux-doc  # the kernel docs corpus

* 15 min 53 s on a 2-core AMD EPYC (20 min 20 s in its slowest hour; README, The demo).

The default corpus is the `modeling_*.py` files of the installed `transformers` package (every
10th file by stable id held out); `sotu` holds out the most recent addresses
(`data.sotu_eval_docs`). One decoder is trained as a baseline twin and as RETRO for the same
steps; the baseline is then retro-fitted.
"""

import ml_collections

from retro_jax.config import default_config, model_config_dict
from retro_jax.errors import RetroError

CODE = "python:transformers/models/*/modeling_*.py"
CODE_SMALL = "python:transformers/models/*/configuration_*.py"


def get_config(arg: str = ""):
    options = set(filter(None, arg.split(",")))
    unknown = sorted(options - {"smallest", "large", "linux-doc", "sotu"})
    if unknown:
        raise RetroError(
            f"config argument {unknown[0]!r}: expected smallest, large, sotu, linux-doc"
        )
    config = default_config()
    config.model = model_config_dict(
        "tiny",
        vocab_size=4096,
        chunk_size=32,
        num_layers=4,
        d_model=128,
        num_heads=4,
        head_dim=32,
        d_ff=512,
        cca_layers=(2, 4),
        enc_d_model=128,
        enc_num_heads=4,
        enc_head_dim=32,
        enc_d_ff=512,
    )
    config.data.train_source = "sotu"
    config.data.eval_source = "sotu"
    config.data.seq_len = 256
    config.data.num_neighbours_stored = 4
    config.data.max_docs = 40  # the 40 addresses before the held-out ones: ~1.9 MB of text
    config.data.sotu_eval_docs = 3
    config.data.vocab_size = 4096
    config.retrieval.bert_max_len = 64

    config.train.steps = 300
    config.train.batch_size = 8
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 30
    config.train.log_every = 25
    config.train.eval_every = 0
    config.train.checkpoint_every = 100
    config.eval.num_neighbours = 2
    config.eval.batch_size = 8

    config.demo = ml_collections.ConfigDict()
    config.demo.retrofit_steps = 150
    config.demo.retrofit_learning_rate = 0.0  # 0: train.learning_rate
    config.demo.retrofit_model = ml_collections.ConfigDict()  # the retro-fit's model options
    config.demo.prompt = "The state of the Union is"
    config.demo.max_new_tokens = 64
    config.demo.seed = 0
    # On a CPU with 2+ cores: baseline -> retro-fit and RETRO train at once, each on half the
    # cores (retro_jax/demo.py); False trains them one after the other on all of them.
    config.demo.parallel_training = True
    # Compiled programs shared by the demo's processes and reruns, in W/jax_cache
    # (retro_jax/demo.py: share_compiles).
    config.demo.share_compiles = True

    code = not options & {"sotu", "linux-doc"}
    if code:  # the default: model code that copies code from other files (RETRO's best case)
        config.data.train_source = config.data.eval_source = CODE
        config.data.max_docs = 60  # training files (of 489; every 10th by id is held out)
        config.data.eval_max_docs = 6  # held-out files scored
        config.data.retrieval_max_docs = 120  # the database: the 60 training files and 60 more
        config.retrieval.align_neighbours = True
        config.retrieval.rerank = 16
        config.retrieval.index.brute_force_below = 100_000  # exact search, as the sweep's
        config.eval.database_fractions = (0.125, 0.25, 0.5, 1.0)
        # The neighbour encoder at half the decoder's width, as in the paper's larger models
        # (its encoder is d 896 at every size): 18% faster a step, and no worse (-10.9% vs
        # -10.3% bpb, benchmarks/results/retrieval_pays.md).
        config.model.update(dict(enc_d_model=64, enc_num_heads=4, enc_head_dim=16, enc_d_ff=256))
        # Beyond the paper: CCA is told how well each neighbour fits the chunk that retrieved
        # it (cca_match_bias) and, for each query, its last 8 tokens (cca_running_match), and
        # may attend to nothing (cca_sink), so it can read a copy while it lasts and stop where
        # it ends. On 51 held-out files RETRO's neighbours then cost nothing where nothing fits
        # (alpha <= 1/8, 600 steps: RETRO - its own RETRO[OFF] -0.003 and -0.001 bpb at two
        # seeds, against +0.011 and +0.017 with none of the three at 800), and its gain grows
        # (-14.0% / -12.8% at 600 steps): benchmarks/results/retrieval_pays.md, a15.
        config.model.update(dict(cca_sink=True, cca_match_bias=True, cca_running_match=8))
        # With the matches, copying is learned by step 500 at 3e-3 from both seeds measured
        # (-13.6% / -12.5%). Fewer steps are not safe: at 400 steps 3e-3 gives -8.5%, and 5e-3
        # -12.5% from seed 0 but -0.9% from seed 1 (benchmarks/results/retrieval_pays.md, a16).
        config.train.steps = 500
        config.train.learning_rate = 3e-3
        # Beyond the paper: one training sequence in five without its neighbours, so that RETRO
        # does not come to lean on them everywhere; at 800 steps without the CCA options, with
        # one in ten RETRO[OFF] scored +4.4% against the baseline (RETRO -16.0%), with one in
        # five +2.4% (RETRO -13.9%): benchmarks/results/retrieval_pays.md, a12 (a9: the same on
        # an earlier release).
        config.train.retrieval_dropout = 0.2
        # The retro-fit's rate has a narrow best: at 600 steps without the CCA options 57% of
        # RETRO's gain at 6e-3, 50% at 1e-2; at 400 steps 1e-2 gives 37%, 2e-2 and 3e-2 under 2%
        # (benchmarks/results/retrieval_pays.md, a7). With the matches it learns faster: 64% of
        # RETRO's gain in 300 steps (78% in 400, a16), and its chain is then the shorter one.
        config.demo.retrofit_steps = 300
        config.demo.retrofit_learning_rate = 6e-3
        # A sink costs a retro-fit much of its gain (38% of RETRO's with it, 62% without, a15):
        # the frozen decoder's retro-fit reads the matches without it.
        config.demo.retrofit_model.cca_sink = False
        config.demo.prompt = "class LlamaAttention(nn.Module):"
    if "linux-doc" in options:
        config.data.train_source = "linux-doc"
        config.data.eval_source = "linux-doc"
        config.demo.prompt = "The kernel provides"

    if "smallest" in options:  # the end-to-end test: a couple of minutes
        config.model.update(dict(num_layers=2, d_model=64, num_heads=2, d_ff=256, cca_layers=(2,)))
        config.model.update(dict(enc_num_layers=1, enc_d_model=64, enc_num_heads=2, enc_d_ff=256))
        config.model.vocab_size = config.data.vocab_size = 512 if code else 1024
        # BERT's keys are most of this size's prepare: fewer, shorter chunks to embed. Code: the
        # packages' configuration files, a twentieth of the length of its model files.
        if code:
            config.data.train_source = config.data.eval_source = CODE_SMALL
        config.data.max_docs = 8 if code else 12
        config.data.eval_max_docs = 2 if code else 0
        config.data.retrieval_max_docs = 12 if code else 0
        config.retrieval.bert_max_len = 32
        config.data.sotu_eval_docs = 2
        config.data.seq_len = 128
        config.eval.database_fractions = (0.5, 1.0) if code else ()
        config.train.steps = 6
        config.train.warmup_steps = 2
        config.train.log_every = 2
        config.train.checkpoint_every = 6
        config.demo.retrofit_steps = 4
        config.demo.max_new_tokens = 40
        config.eval.max_batches = 4
    if "large" in options:  # more data and steps (sotu: the whole corpus, ~40 minutes)
        config.data.max_docs = 120 if code else 0
        config.data.retrieval_max_docs = 240 if code else 0
        config.data.eval_max_docs = 10 if code else 0
        config.data.sotu_eval_docs = 10
        config.train.steps = 1000
        config.train.warmup_steps = 100
        config.train.log_every = 50
        config.train.checkpoint_every = 250
        config.demo.retrofit_steps = 300
    return config
