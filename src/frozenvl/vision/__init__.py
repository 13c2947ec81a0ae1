"""Vision side: encoders, connectors, image loading and preprocessing."""
