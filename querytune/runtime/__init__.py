"""What runs a model folder: its files and version, prompt and completion formats, the output grammar,
generation and the backends."""

import warnings

# peft's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning: every process that wraps a model in LoRA (training, the dtype probe, loading an adapter folder)
# printed the block once, one per stage of the demo. Only this warning is filtered: peft's to fix, ours to keep out.
warnings.filterwarnings(
    "ignore",
    message=r"`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
)
