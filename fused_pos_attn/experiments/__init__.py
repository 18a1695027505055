"""Length-generalization and efficiency experiments behind `python -m fused_pos_attn extrapolate | claims |
passkey | latency` (each writes markdown + CSV (+ PNG) to bench/results/ under the current directory by
default, or to --out-dir; never into the installed package)."""
