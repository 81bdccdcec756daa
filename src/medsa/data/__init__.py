"""medsa.data"""
