"""InternLM2 7B: LoRA on Stanford Alpaca (52k instructions), 3 epochs.

    packtune copy-cfg internlm2_7b_lora_alpaca_e3 .
    packtune train internlm2_7b_lora_alpaca_e3_copy.py
"""

########################################################################
#                           PART 1  Settings                           #
########################################################################
# Model
pretrained_model_name_or_path = 'internlm/internlm2-7b'
# InternLM2's modeling code exists only as remote code (trust_remote_code), which does not
# route attention through transformers' AttentionInterface: packtune's varlen attention is
# not proven for it yet. Without varlen attention, packed samples would attend to each
# other, so packing is off too: one sample per row.
use_varlen_attn = False

# Data
dataset = 'tatsu-lab/alpaca'
dataset_format = 'alpaca'
prompt_template = 'internlm2_chat'
max_length = 2048
pack_to_max_length = False  # see use_varlen_attn above

# Scheduler & Optimizer
batch_size = 1  # rows per device
accumulative_counts = 16
max_epochs = 3
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0  # gradient clipping
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2  # checkpoints kept

# Evaluate the generation performance during the training
evaluation_freq = 500
system_prompt = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
evaluation_inputs = [
    'Please tell me five scenic spots in Shanghai.',
    'Write a Python function that reverses a string.',
]

########################################################################
#                            PART 2  Model                             #
########################################################################
trust_remote_code = True
dtype = 'bfloat16'
gradient_checkpointing = True
lora = dict(r=64, alpha=16, dropout=0.1, target_modules='all-linear', quantization=None)

########################################################################
#                           PART 3  Dataset                            #
########################################################################
dataset_split = 'train'
overflow = 'truncate'  # samples longer than max_length

########################################################################
#                    PART 4  Scheduler & Optimizer                     #
########################################################################
loss_reduction = 'token'  # every trained token weighs the same

########################################################################
#                           PART 5  Runtime                            #
########################################################################
log_steps = 10
max_new_tokens = 64
seed = 0
