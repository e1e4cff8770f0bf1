"""The online serving tiers and the HTTP ranking service."""
