from comfy_env_attn.cli import console

console()
