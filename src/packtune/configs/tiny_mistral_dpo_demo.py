"""Tiny Mistral (random init), DPO on preference pairs made from the demo tasks.

Runs offline on a 2-core CPU in minutes: the right answer chosen, a wrong one rejected
(``packtune://demo_pairs.jsonl``, ``packtune.demo_data.build_demo_pairs``); the reference is a
frozen copy of the starting weights. ``rewards/accuracies`` in metrics.jsonl rises.

    packtune train tiny_mistral_dpo_demo
"""

########################################################################
#                           PART 1  Settings                           #
########################################################################
# Model
pretrained_model_name_or_path = None  # random init from model_config (PART 2)
use_varlen_attn = True

# Data
dataset = 'packtune://demo_pairs.jsonl'
dataset_format = 'preference'
method = 'dpo'
dpo_loss = 'sigmoid'
beta = 0.5
prompt_template = 'mistral'
max_length = 256
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 4
accumulative_counts = 1
max_steps = 150  # overrides max_epochs
lr = 3e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05

# Save
save_steps = 150
save_total_limit = 2

# Evaluate the generation performance during the training
evaluation_freq = 150
system_prompt = None
evaluation_inputs = [
    'Repeat after me: red river stone',
    'What sound does a cow make?',
    'What is the opposite of hot?',
]

########################################################################
#                            PART 2  Model                             #
########################################################################
model_config = dict(
    model_type='mistral',
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=512,
)
tokenizer_name_or_path = 'packtune://mistral-v1'
dtype = 'float32'  # CPU
lora = None  # full training of the tiny model

########################################################################
#                           PART 3  Dataset                            #
########################################################################
pack_strategy = 'bfd'
shuffle_before_pack = True
overflow = 'truncate'

########################################################################
#                    PART 4  Scheduler & Optimizer                     #
########################################################################
loss_reduction = 'token'

########################################################################
#                           PART 5  Runtime                            #
########################################################################
log_steps = 10
max_new_tokens = 32
seed = 0
