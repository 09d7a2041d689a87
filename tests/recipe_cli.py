"""A stand-in for `python -m vrft_jax.train` in tests: parses the flags as the loop does and prints
what it got as one JSON line (the resolved config and the workdir)."""

import json

from absl import app

from vrft_jax import recipe

recipe.define_flags()


def main(argv):
    del argv
    config, workdir = recipe.from_flags()
    print(json.dumps({"workdir": workdir, "config": json.loads(config.to_json())}))


if __name__ == "__main__":
    app.run(main, flags_parser=recipe.parse_flags)
