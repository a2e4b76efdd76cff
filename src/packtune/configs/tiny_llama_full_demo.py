"""Tiny Llama (random init), full training on the demo tasks.

Runs offline on a 2-core CPU in minutes: a randomly initialised tiny model, the bundled
Mistral v1 tokenizer (vocab 32000) and the bundled demo dataset.

    packtune train tiny_llama_full_demo
"""

########################################################################
#                           PART 1  Settings                           #
########################################################################
# Model
pretrained_model_name_or_path = None  # random init from model_config (PART 2)
use_varlen_attn = True

# Data
dataset = 'packtune://demo_tasks.jsonl'
dataset_format = 'alpaca'
prompt_template = 'llama2_chat'
max_length = 512
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 4
accumulative_counts = 1
max_steps = 200  # overrides max_epochs
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05

# Save
save_steps = 100
save_total_limit = 2

# Evaluate the generation performance during the training
evaluation_freq = 100
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
    model_type='llama',
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
