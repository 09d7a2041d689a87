"""`make demo`: a tiny Qwen2-VL with the real tokenizer learns to name synthetic shapes, on 2 CPU cores.

The data is `vrft_jax.data.synthetic`'s classification source (one circle, square or triangle per
image, answer `<answer>square</answer>`), made by `prepare synthetic` under runs/demo/data so a
second run reuses it: 256 training images and 64 held-out ones of another seed. The model is random
(no checkpoint): `warm_start.sft_steps` of SFT on the answers teach it the answer format first,
then GRPO with the strict classification reward. Every size is the smallest that still shows
learning: 2 layers of width 128 over the real 151,936-token vocabulary, images of at most 112 x 112
pixels (16 visual tokens), 8 prompts x G 8 per step, float32 throughout.
"""

from vrft_jax.configs import _common


def get_config(arg=None):
    _common.parse_arg(arg)  # takes no arguments; one given is an error naming it
    c = _common.base_config(name="demo", model="2b")
    c.slice = "cpu"
    c.total_steps = 40
    c.log_every = 1
    c.ckpt_every = 20
    c.keep_checkpoints = 2
    c.sample_every = 10
    c.eval_every = 20

    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    c.remat = "none"
    c.prompts_per_step = 8

    c.model.preset = "custom"
    c.model.checkpoint = ""  # random initial weights from the seed
    c.model.hub_id = ""
    c.model.text = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(4, 6, 6))
    c.model.vision = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, out_dim=128)
    c.model.tie_word_embeddings = True

    c.source.prepare = "synthetic --task classification --num-images 256 --seed 0"
    c.data.path = "runs/demo/data/synthetic_shapes"
    c.data.max_prompt_len = 128  # the prompt is about 110 tokens with its image
    c.data.max_pixels = 112 * 112
    c.data.num_workers = 0  # two cores: the loop needs both
    c.eval.path = "runs/demo/data/synthetic_shapes_heldout"
    c.eval.split = "test"
    c.eval.prepare = "synthetic --task classification --num-images 64 --seed 1 --split test"

    c.sampling.max_new_tokens = 32
    c.sampling.group_size = 8
    c.train.learning_rate = 5e-5
    c.warm_start.sft_steps = 150
    c.warm_start.learning_rate = 1e-3

    c.rewards.mode = "strict"  # not a reproduction: the hardened rewards
    c.rewards.terms = {"classification": 1.0}  # SFT on plain answers cannot reach the <think> format
    return c
