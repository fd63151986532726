"""Attribution graphs across denoising steps: transcoders, the replacement model of one trajectory, graphs."""
