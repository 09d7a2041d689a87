"""Run recipes, one per file, big_vision style: `get_config(arg: str | None) -> ml_collections.ConfigDict`.

    lvis_fewshot     LVIS few-shot detection, 6 rare categories            model=2b|7b
    coco_fewshot     COCO few-shot detection, 8 categories                 model=2b|7b, shots=1|2|4|8|16
    coco_ov_base65   open-vocabulary COCO: 6k samples of 65 base classes   model=2b|7b
    cls_fewshot      few-shot fine-grained classification                  model=2b|7b,
                                                                           dataset=flowers|pets|aircraft|cars,
                                                                           shots=1|2|4|8|16
    lisa_grounding   LISA reasoning grounding                              model=2b|7b
    demo             a tiny Qwen2-VL with the real tokenizer on synthetic shapes, for 2 CPU cores

model= is a Qwen2-VL size (2b, 7b) or another family's preset (`_common.MODEL_SETTINGS`): qwen2_5_vl_3b,
qwen2_5_vl_7b (boxes in pixels of the resized image), qwen3_vl_2b, qwen3_vl_4b, qwen3_vl_8b.

`vrft_jax.recipe` loads them (`--config=coco_fewshot:model=7b,shots=8`) and builds their settings;
`_common.py` holds what they share. Recipes import nothing but ml_collections.
"""
