"""Training: the AlignProp loop and its step, exact-resume train state, and reward augmentation."""
