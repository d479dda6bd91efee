"""What every stage uses: JSON logs and unix socket helpers."""
