"""Length-generalization and efficiency experiments behind `python -m fused_pos_attn extrapolate | claims |
passkey | latency` (each writes markdown + CSV (+ PNG) to bench/results/ by default)."""
