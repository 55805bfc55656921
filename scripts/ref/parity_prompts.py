"""The prompts and sizes of kiln's logit parity fixtures, shared by the
reference generators (logits_ref.py: llama.cpp, logits_ref_hf.py: transformers)."""

TOP_K = 40
N_CONT = 32

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377,",
    "Q: What is the boiling point of water at sea level in degrees Celsius?\nA:",
    "The quick brown fox jumps over the lazy dog. This sentence contains every letter of the",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The mission was called",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "#include <stdio.h>\n\nint main(void)\n{\n    for (int i = 0; i < 10; i++)\n",
    "Machine learning models are trained on large datasets. Overfitting happens when a model",
    "The mitochondria is often called the powerhouse of the cell because it",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY",
    "Dear hiring manager,\n\nI am writing to apply for the position of software engineer at your company.",
    "The French Revolution began in 1789 and led to profound changes in European society, including",
    "To make a cup of tea, first boil some water. Then place a tea bag in a cup and",
    "Water is composed of two hydrogen atoms and one oxygen atom. Its chemical formula is",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\n",
    "The theory of relativity, developed by Albert Einstein, consists of two parts: special relativity and",
    "Tokyo, Osaka, Kyoto and Sapporo are cities in Japan. Seoul and Busan are cities in",
]


# One long prompt (> 512 tokens, Gemma 3's sliding window) so the parity test
# covers sliding-window layers and long-range RoPE; written to a second
# fixture with `logits_ref_hf.py --long`.
LONG_PROMPT = " ".join(
    f"Section {i}: the river {['rose', 'fell', 'froze', 'flooded'][i % 4]} in year {1800 + 7 * i}, "
    f"and the town council recorded {i * 13 % 97} complaints about the {['bridge', 'mill', 'ferry'][i % 3]}."
    for i in range(40)
) + " In summary, the most common complaint was about the"
