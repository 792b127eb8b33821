"""Training side: compact ViT, masking, MIM objectives (K-MIM token CE, MAE pixels, BEiT) and MTO losses."""
