"""The "refund desk" example mesh (issue 4, in progress): so far, the payment gateway stand-in."""
