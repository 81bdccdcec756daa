"""medsa.engine"""
