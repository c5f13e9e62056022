"""Speed: the NCES engine (``nces``; its ``--screen`` and ``--sharding`` options time the
second-order screen and several processes), training throughput (``training``), and how well
the screen ranks latents against the exact engine (``screen_vs_exact``)."""
