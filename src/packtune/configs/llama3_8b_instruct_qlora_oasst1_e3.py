"""Llama 3 8B Instruct: QLoRA (4-bit) on OpenAssistant Guanaco (oasst1, ~9.8k conversations), 3 epochs.

    packtune copy-cfg llama3_8b_instruct_qlora_oasst1_e3 .
    packtune train llama3_8b_instruct_qlora_oasst1_e3_copy.py
"""

########################################################################
#                           PART 1  Settings                           #
########################################################################
# Model
pretrained_model_name_or_path = 'meta-llama/Meta-Llama-3-8B-Instruct'
use_varlen_attn = True  # exact per-sample attention inside packed rows

# Data
dataset = 'timdettmers/openassistant-guanaco'
dataset_format = 'oasst1'
prompt_template = 'llama3_chat'
max_length = 2048
pack_to_max_length = True  # needs use_varlen_attn = True

# Scheduler & Optimizer
batch_size = 1  # packed rows per device
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
system_prompt = None
evaluation_inputs = [
    'Please tell me five scenic spots in Shanghai.',
    'Write a Python function that reverses a string.',
]

########################################################################
#                            PART 2  Model                             #
########################################################################
trust_remote_code = False
dtype = 'bfloat16'
gradient_checkpointing = True
# QLoRA loads the base weights in 4 bit: needs a CUDA GPU and bitsandbytes.
lora = dict(r=64, alpha=16, dropout=0.1, target_modules='all-linear', quantization='4bit')

########################################################################
#                           PART 3  Dataset                            #
########################################################################
dataset_split = 'train'
pack_strategy = 'bfd'  # best-fit decreasing: fewest rows, order-free
shuffle_before_pack = True
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
