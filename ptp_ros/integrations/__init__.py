"""Bridges from ptp_ros to other tools' plugin interfaces (each imports its tool only when loaded)."""
