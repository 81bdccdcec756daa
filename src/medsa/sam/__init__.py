"""medsa.sam"""
