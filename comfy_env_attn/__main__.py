import sys

from comfy_env_attn.cli import entry

sys.exit(entry())
