"""`make demo`: a tiny Qwen2-VL with the real tokenizer learns to name a shape's colour, on 2 CPU cores.

The data is `vrft_jax.data.synthetic`'s classification source asked for the colour of one large shape
(six colours, the shape covering a quarter to all of the image; answer `<answer>orange</answer>`),
made by `prepare synthetic` under runs/demo/data so a second run reuses it: 2048 training images and
2048 held-out ones of another seed, enough to resolve the gain of a warm start that is already good. The model
is random (no checkpoint): 140 steps of SFT on the answers (`warm_start`, a run of its own, reused by a second
`make demo`) teach it the answer format and most of the colours, then 100 GRPO steps with the strict
classification reward and a format term.
Sizes: 2 layers of width 128 over the real 151,936-token vocabulary, images of at most 112 x 112 pixels
(16 visual tokens), 16 prompts x G 4 per update drawn from 48 (16 samples per SFT step), 8 new tokens (the
answer and its EOS), float32. Not a reproduction.

The held-out accuracy of greedy answers is evaluated before and after GRPO and the run ends with its report,
runs/demo/report/report.html. GRPO here runs with the collapse guards (`vrft_jax.collapse`, issue 23): a KL to
the warm start (beta 0.04), lr 5e-4, the `answer_format` term (0.5: one answer block ended by EOS), and
oversampling (48 prompts drawn per step, the update taking 16 groups, those with a signal first). Without them,
at lr 1e-3 and beta 0, seeds 1 and 2 collapsed by the third step to text without an answer and seed 0 ran
every completion to the token limit (`<answer>green</answer></answer></answer`).

What makes it learn on every seed (`benchmarks/demo_seeds.py` measures it per seed; the README gives the table of
seeds 0-9 and the runs that chose these values):
- Oversampling with rollouts at temperature 0.7. From a good warm start most groups are flat (every sample right)
  and the signal is on the few images it gets wrong. Drawing three times the prompts and keeping the groups that
  disagree puts those in every update; at 0.7 the samples are near the greedy answers the evaluation reads, so
  the groups that disagree are the images the greedy answer gets wrong, not the tail tokens that temperature 1
  draws on easy ones. Redrawing the same prompts (dynamic sampling) at temperature 1 gained less than half as much.
- A warm start of 140 SFT steps, which leaves GRPO something to learn: after 180 the errors left were images the
  model is sure of, where no sample disagrees. After 140 some seeds never answer one colour; oversampled GRPO
  learns it from its own samples (the earlier GRPO only moved the boundary between the two colours).
- The sizes keep every colour in reach: 16 samples per SFT step (8 left a pair of colours unsplit more often),
  48 drawn prompts hold every colour, and the 8 new tokens are the answer and its EOS: anything longer is cut,
  and the update and the reference score 8 positions, not 12.
"""

from vrft_jax.configs import _common

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {}  # none: one given is an error naming it


def get_config(arg=None):
    _common.parse_arg(arg, **ARGS)
    c = _common.base_config(name="demo", model="2b")
    c.slice = "cpu"
    c.total_steps = 100
    c.log_every = 1
    c.ckpt_every = 50  # a checkpoint is 207 MB (the 151,936-row embedding and its Adam moments): 6 saves, not 14
    c.keep_checkpoints = 2
    c.sample_every = 10
    c.export_hf = True  # the trained model as a Hugging Face directory, runs/demo/hf
    c.eval_every = c.total_steps  # before and after GRPO only: 2048 greedy answers each, in the 10 minutes

    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    c.remat = "none"
    c.prompts_per_step = 16  # x G 4 per update (16 samples per SFT step); oversampling draws 48
    c.temperature = 0.7  # the rollout's and the scorer's; the warm start's cross-entropy is at 1 (`sft.run_config`)

    c.model.preset = "custom"
    c.model.checkpoint = ""  # random initial weights from the seed
    c.model.hub_id = ""
    c.model.text = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(4, 6, 6))
    c.model.vision = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, out_dim=128)
    c.model.tie_word_embeddings = True

    c.source.prepare = "synthetic --task classification --label colour --shape-size large --num-images 2048 --seed 0"
    c.data.path = "runs/demo/data/colours_2048"
    c.data.max_prompt_len = 128  # the prompt is about 110 tokens with its image
    c.data.max_pixels = 112 * 112
    c.data.num_workers = 0  # two cores: the loop needs both
    c.eval.path = "runs/demo/data/colours_heldout_2048"
    c.eval.split = "test"
    c.eval.prepare = ("synthetic --task classification --label colour --shape-size large --num-images 2048 --seed 1 "
                      "--split test")
    c.eval.type = "classification"  # accuracy by both rules, and the strict reward, every eval_every steps
    c.eval.parse = "strict"
    c.eval.repetition_penalty = 1.0  # a model trained from scratch has no generation config to follow

    c.sampling.max_new_tokens = 8  # `<answer>orange</answer>` and EOS, every colour: anything longer is cut
    c.sampling.group_size = 4
    c.train.learning_rate = 5e-4
    c.grpo.beta = 0.04  # the KL to the warm start keeps the answers' spread (beta 0 collapsed seeds 1 and 2)
    c.collapse.oversample = 3  # 48 prompts drawn, 16 groups trained on, the non-flat ones first
    c.warm_start.sft_steps = 140
    c.warm_start.learning_rate = 1e-3

    c.rewards.mode = "strict"  # not a reproduction: the hardened rewards
    # SFT on plain answers cannot reach the <think> format; answer_format pays ending on EOS after one answer
    c.rewards.terms = {"classification": 1.0, "answer_format": 0.5}
    return c
