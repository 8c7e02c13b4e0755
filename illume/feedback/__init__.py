"""feedback: the hand-out queue and the verdict rules; the store itself is illume.store.
`queue.AnnotationQueue` hands a round's items to people (leases, submissions, revisions, progress) over the
store's tables; `verdicts` turns the judgments the store holds (`FeedbackStore.judged_items`) into what was
accepted, for every trainer, the reward model and the exports.
"""
