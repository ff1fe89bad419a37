"""The training vocabulary, torch-free: the command line offers these choices before torch loads,
and the training code checks its arguments against the same tuples.

>>> TRAIN_METHODS
('lora', 'qlora', 'full', 'adapter', 'adapter_v2')
"""

#: LitGPT's LLaMA-Adapter and LLaMA-Adapter V2 (lucidlm.train.adapter)
ADAPTER_METHODS = ("adapter", "adapter_v2")
#: ``finetune(method=...)``: LoRA, LoRA over int8 base weights, every weight, or an adapter
TRAIN_METHODS = ("lora", "qlora", "full", *ADAPTER_METHODS)
#: ``precision=``: auto = bf16-mixed where the hardware computes bfloat16 natively
PRECISIONS = ("auto", "fp32", "bf16-mixed")
#: ``strategy=`` under torchrun: auto = DDP for LoRA, FSDP2 for full fine-tuning
STRATEGIES = ("auto", "ddp", "fsdp")
#: how instruction records become prompts: the chat template (auto, when there is one) or Alpaca's
PROMPT_STYLES = ("auto", "chat", "alpaca")
