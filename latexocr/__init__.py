"""What the four pipeline scripts must agree on: prompt, image sizing, chat messages, labels, data files."""
