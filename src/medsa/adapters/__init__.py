"""medsa.adapters"""
