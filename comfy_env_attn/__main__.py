import sys

from comfy_env_attn.cli import main

sys.exit(main())
