import type { Routes } from '../http.js';

export const budgetRoutes: Routes = {};
