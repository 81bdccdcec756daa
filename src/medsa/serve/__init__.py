"""medsa.serve"""
